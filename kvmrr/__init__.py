"""kvmrr: instruction-level record/replay fault tolerance for KVM virtual machines."""
__version__ = "0.1.0"
