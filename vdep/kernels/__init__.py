"""Fused implementations of the VDEP image term.

`fused_vdep.py` holds the Triton kernel (forward and backward read each selected row once; a
pass-through form for the identity head adds the VDEP gradient into the text loss's; the linear head
runs chunk by chunk in front of it). Which implementation a stage uses is the objective's choice
(`vdep.objectives.objective.select_term`); `vdep.objectives.losses.reference_vdep_sum` is the ground
truth every kernel is tested against.
"""
