"""workers/clients: the Broadcastify API client over real HTTP."""
