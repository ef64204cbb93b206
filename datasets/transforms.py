"""Transforms of the reference probe: per-dataset presets (eval, 224px, 32px), any crop size via --img_size, and
the input recipe of backbones that expect another one than the reference's (models.backbones.input_recipe)."""
from torchvision import transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
TF_NAMES = ("eval", "224px", "32px")


def crop_size(family, tf_name, img_size=None, recipe=None):
    """The crop the encoder sees: --img_size, else the preset's (32px: 32), else the backbones' recipe's on
    ImageNet-like data (224 for the reference)."""
    if img_size:
        return img_size
    if tf_name == "32px":
        return 32
    return recipe.crop if recipe is not None and family != "cifar" else 224


def build_transform(family, tf_name, train, img_size=None, recipe=None):
    """family: 'cifar' or 'imagenet' (ImageNet and iNat18). img_size overrides the preset's crop;
    the test resize is int(8/7 of the crop), the reference's (256 for 224, 36 for 32).

    recipe: None (the reference's transform), or the backbones' own (crop, resize, interpolation, mean, std; see
    models.backbones.InputRecipe), applied to ImageNet-like data at the crop size (resize scaled with it); CIFAR
    keeps the reference's transform for every backbone."""
    if tf_name not in TF_NAMES:
        raise ValueError(f"unknown tf_name {tf_name}")
    if tf_name == "32px" and family != "cifar":
        raise ValueError("the 32px preset is for CIFAR only")
    crop = crop_size(family, tf_name, img_size, recipe)
    if family != "cifar" and recipe is not None:
        mode = T.InterpolationMode(recipe.interpolation)
        train_crop = T.RandomResizedCrop(crop, interpolation=mode)
        test_resize = T.Resize(crop * recipe.resize // recipe.crop, interpolation=mode)
        steps = [train_crop, T.RandomHorizontalFlip()] if train else [test_resize, T.CenterCrop(crop)]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)])
    resize = int(crop * 8 / 7)  # the reference truncates: 224 -> 256, 32 -> 36
    if family == "cifar":
        mean, std = CIFAR_MEAN, CIFAR_STD
        bicubic = T.InterpolationMode.BICUBIC
        train_crop = T.RandomResizedCrop(crop, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), interpolation=bicubic)
        test_resize = T.Resize(resize, interpolation=bicubic)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        train_crop = T.RandomResizedCrop(crop)
        test_resize = T.Resize(resize)
    steps = [train_crop, T.RandomHorizontalFlip()] if train else [test_resize, T.CenterCrop(crop)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
