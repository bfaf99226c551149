"""etchr_eval: the Edit-Verify-Reason evaluation of ETCHR (Evaluation/ tree)."""
