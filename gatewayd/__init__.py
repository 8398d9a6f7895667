"""gatewayd: an edge gateway daemon for CoAP/CBOR sensor nodes."""

__version__ = "0.1.0"
