"""finetune: fine-tune timm ResNets with accelerate, benchmark dropout placements, publish to the Hub.

Command line: ``python -m finetune train|bench|eval|push`` (or ``accelerate launch -m finetune train``).
From Python:

    >>> from finetune.config import TrainConfig
    >>> from finetune.train import train                                        # doctest: +SKIP
    >>> train(TrainConfig(model='resnet18', data_dir='../shared/data/pets370', epochs=1))  # doctest: +SKIP
"""
