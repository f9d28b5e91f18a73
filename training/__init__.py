"""Building models: the default model's training, the blob model of the parity benchmark, lesion-filter tuning."""
