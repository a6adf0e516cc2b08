"""workers/dev and the deployment: the feed simulator, the throwaway servers, compose.yaml."""
