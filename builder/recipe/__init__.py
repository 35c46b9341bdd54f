"""Recipes, from file to plan: the format (``format``), its YAML loader (``_yaml``), lock files
(``lock``), the CI matrix (``matrix``), finetuning datasets (``dataset``) and planning a build
step (``plan``). Nothing here runs a container or touches the network."""
