"""One run against a client: pull, restore, the steps they share, and what verifies them."""
