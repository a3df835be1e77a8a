"""First-party genie components (import name `genie_plugins`). Each module registers through the public
`genie_register_components` hook, exactly as a third-party plugin does; genie_core.registry.BUILTIN_PLUGINS lists
them."""
