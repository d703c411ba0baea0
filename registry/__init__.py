"""MLflow registry of generators and probe sets: registration with lineage, gated promotion by alias, history,
and loading by alias through a verified local cache. No torch here: artifacts are plain files."""
