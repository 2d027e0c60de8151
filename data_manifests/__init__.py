"""Dataset manifests (one YAML per dataset), shipped as package data of diffugts_core."""
