"""etchr_rl: Flow-GRPO for the FLUX.2-klein editor with MLLM-judge rewards (RL/ tree)."""
