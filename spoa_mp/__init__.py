"""spoa-mp: a pre-fork HAProxy SPOE agent with a C frame codec."""

__version__ = "0.1.0"
