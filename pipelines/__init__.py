"""Ray recipes on top of core: COCO reading and augmentation on Ray Data, training, evaluation, inference."""
