"""Ready Ray Tune search spaces for posthoc_tune, with documented defaults and sources."""
