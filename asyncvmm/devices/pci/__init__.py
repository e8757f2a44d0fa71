"""PCI: the configuration space model, MSI-X, and the root complex on bus 0."""
