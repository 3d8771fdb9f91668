"""The worker's own behaviour, shipped as plugins registered exactly like installed ones."""
