"""Ray Tune sweeps over the training job: each trial a full Ray Train run of pipelines' training."""
