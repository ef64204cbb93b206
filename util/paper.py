"""The paper's numbers, one owner for the README and tools/summarize.py --paper.

Linear-probe top-1 (%) of Figure 2 of arXiv 2506.18221 (Yang, Zhang, Bottou), as the original repository's README
shows it (facebookresearch/richreps-timecat, its Figure 2 table): ResNet50s pretrained with
schedule-free AdamW on ImageNet1k; cat1 is a single ResNet50 trained 450k steps (the original averages five seeds),
catN the concatenation of N ResNet50s trained 400k/N steps each. The paper gives no error bars for these cells.
Depends on nothing of ours (a util module).
"""
SOURCE = "arXiv 2506.18221, Figure 2 of the original README"
# (number of backbones, steps per backbone as tools/summarize.py names them: 'full' = 450k, '80' = 80k) ->
# {data_name: top-1}
FIGURE2 = {
    (1, "full"): {"imagenet1k": 78.4, "inaturalist18": 33.7, "cifar100": 71.0, "cifar10": 90.4},
    (2, "200"): {"imagenet1k": 78.5, "inaturalist18": 40.4, "cifar100": 74.2, "cifar10": 91.2},
    (4, "100"): {"imagenet1k": 78.3, "inaturalist18": 42.9, "cifar100": 76.8, "cifar10": 92.7},
    (5, "80"): {"imagenet1k": 77.8, "inaturalist18": 46.2, "cifar100": 77.1, "cifar10": 92.8},
}
# The seed-to-seed standard deviation of one probe's top-1 used when the user's results hold fewer than two cat1
# seeds of a dataset: an assumption (typical of linear probes of ResNet50s), not a measurement, and not the paper's.
DEFAULT_SEED_STD = 0.5
# A difference is flagged when it exceeds this many seed standard deviations (about a 95% band for one run).
FLAG_SIGMAS = 2.0


def paper_value(config, data_name):
    """The paper's top-1 of a Figure 2 cell, or None."""
    return FIGURE2.get(tuple(config), {}).get(data_name)
