"""Data: CT phantoms, dataset label maps, manifests and DataModules."""
