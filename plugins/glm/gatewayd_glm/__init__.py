"""gatewayd GLM plugin: text to JSON intents with a small GLM-architecture model."""
