__version__ = "0.1.0"
# The Ollama release whose API Ember implements: /api/version reports it, since
# clients gate features on it (Open WebUI refuses servers below 0.1.16).
OLLAMA_API_VERSION = "0.12.0"
