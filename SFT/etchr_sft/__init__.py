"""etchr_sft: supervised fine-tuning of FLUX.2-klein as a question-conditioned editor (SFT/ tree)."""
