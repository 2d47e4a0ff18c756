"""The Ray Train plumbing: joining Ray, the datasets of a run, one TorchTrainer builder, the worker loops."""
