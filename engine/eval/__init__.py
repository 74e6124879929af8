"""Measuring generated video: fidelity against a reference run, and (later) prompt adherence."""
