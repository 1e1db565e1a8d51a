"""The pure model of a scenario: topology description, radio links, device profiles,
prompts and the names every layer shares. No side effects; every other layer uses it."""
