"""rmserve service: the HTTP scoring service, its CLI and its client."""
