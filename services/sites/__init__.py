"""Remote sites (hospitals): their broker users, signing keys and startup kits."""
