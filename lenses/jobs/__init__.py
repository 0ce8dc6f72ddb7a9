"""Jobs that fit or measure something, resumable and on one process or many: tuned-lens training, the J-lens
fit, memory plans, sharding, coverage."""
