"""Optional integrations with other libraries; each submodule imports its library on first use.

- :mod:`kdkernels.integrations.transformers`: ``DistillationTrainer`` (needs ``kdkernels[hf]``).
- :mod:`kdkernels.integrations.trl`: ``generalized_jsd_loss``, a drop-in for TRL's GKD loss
  (needs nothing beyond kdkernels itself).

Importing ``kdkernels`` or this package imports neither transformers nor trl.
"""
