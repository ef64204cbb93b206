"""Schedule-free AdamW exactly as AlgoPerf's self-tuning submission updates it (the released checkpoints' rule).

Why our own class: the `schedulefree` package's AdamWScheduleFree applies the weight decay at y (the point where
the gradient is taken); AlgoPerf's submission (shipped inside that package, but importing AlgoPerf's framework)
applies it at x. The update at step k (k from 0), per parameter group (AlgoPerf's submission):

    lr_k   = max(lr * min(1, (k + 1) / warmup_steps), eps)      lr_max = max(lr_max, lr_k)
    weight = (k + 1)^r * lr_max^weight_lr_power                 weight_sum += weight;  c = weight / weight_sum
    step   = lr_k * sqrt(1 - beta2^(k + 1))
    g      = gradient at y = x + (1 - beta1) (z - x)
    v      = beta2 v + (1 - beta2) g^2                          (v in bfloat16 in the submission: the default)
    z      = z - step * g / (sqrt(v) + eps) - step * weight_decay * x
    x      = (1 - c) x + c z

Like the package's optimizers, train() puts y in the parameters (train-mode forwards and step()) and eval() puts
x there (evaluation and checkpoints). x and z are kept in the optimizer state, so switching modes is exact (no
lerp back and forth). Depends on nothing of ours.
"""
import math

import torch

MOMENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class AlgoPerfAdamWScheduleFree(torch.optim.Optimizer):
    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                 r=0.75, weight_lr_power=2.0, moment_dtype="bfloat16", foreach=False):
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment_dtype must be one of {sorted(MOMENT_DTYPES)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        r=r, weight_lr_power=weight_lr_power, moment_dtype=moment_dtype, k=0, lr_max=0.0,
                        weight_sum=0.0, train_mode=False)
        super().__init__(params, defaults)
        # foreach: the same update as torch._foreach_* calls over all parameters of a group (a few kernels instead
        # of seven per parameter); bit-identical on CPU (tests/test_sfadamw.py), not part of the state_dict
        self.foreach = foreach

    def _state(self, p, group):
        """x, z and v of a parameter, created from the parameter (x = z = the initial weights) on first use."""
        state = self.state[p]
        if "x" not in state:
            state["x"] = p.detach().clone()
            state["z"] = p.detach().clone()
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=MOMENT_DTYPES[group["moment_dtype"]])
        return state

    def load_state_dict(self, state_dict):
        """torch.optim casts loaded state to each parameter's dtype: give v back its own (bf16 -> fp32 -> bf16 is
        exact), so a resumed run continues bit for bit."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "exp_avg_sq" in state:
                    state["exp_avg_sq"] = state["exp_avg_sq"].to(MOMENT_DTYPES[group["moment_dtype"]])

    @torch.no_grad()
    def train(self):
        """Parameters at y = x + (1 - beta1)(z - x), where the gradient is taken."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self._state(p, group)
                p.copy_(torch.lerp(state["x"], state["z"], 1 - group["betas"][0]))
            group["train_mode"] = True

    @torch.no_grad()
    def eval(self):
        """Parameters at x, the averaged weights that are evaluated and saved."""
        for group in self.param_groups:
            for p in group["params"]:
                p.copy_(self._state(p, group)["x"])
            group["train_mode"] = False

    @staticmethod
    def _coefficients(group):
        """(step size, averaging weight c) of this step; advances the group's k, lr_max and weight_sum."""
        k, (_, beta2) = group["k"], group["betas"]
        warmup = min(1.0, (k + 1) / group["warmup_steps"]) if group["warmup_steps"] else 1.0
        lr = max(group["lr"] * warmup, group["eps"])
        group["lr_max"] = max(group["lr_max"], lr)
        weight = (k + 1) ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
        group["weight_sum"] += weight
        group["k"] = k + 1
        return lr * math.sqrt(1 - beta2 ** (k + 1)), weight / group["weight_sum"]

    @torch.no_grad()
    def step(self, closure=None):
        """One update from the gradients at y; the parameters hold the next y afterwards."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError("optimizer.step() in eval mode: call optimizer.train() with model.train()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            step, c = self._coefficients(group)
            beta1, beta2 = group["betas"]
            if self.foreach:
                self._foreach_update(group, step, c)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p, group)
                x, z, v = state["x"], state["z"], state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                z.addcdiv_(p.grad, v.sqrt().add_(group["eps"]), value=-step)
                z.sub_(x, alpha=step * group["weight_decay"])  # decoupled decay taken at x (the package: at y)
                x.lerp_(z, c)
                p.copy_(torch.lerp(x, z, 1 - beta1))
        return loss

    def _foreach_update(self, group, step, c):
        """step()'s per-parameter update, each line as one torch._foreach_* call over the group's parameters (same
        operations in the same order: on CPU these run the per-tensor kernels, so the result is bit-identical)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self._state(p, group) for p in params]
        grads = [p.grad for p in params]
        x, z, v = ([s[k] for s in states] for k in ("x", "z", "exp_avg_sq"))
        beta1, beta2 = group["betas"]
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(v)
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(z, grads, denominators, value=-step)
        torch._foreach_sub_(z, x, alpha=step * group["weight_decay"])
        torch._foreach_lerp_(x, z, c)
        torch._foreach_copy_(params, torch._foreach_lerp(x, z, 1 - beta1))
