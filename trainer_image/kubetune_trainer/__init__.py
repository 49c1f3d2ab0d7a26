"""The kubetune trainer: one FineTuneJob spec in, a fine-tuned model and a run summary out."""
