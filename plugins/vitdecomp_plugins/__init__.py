"""vitdecomp's built-in model-family plugins, one module per family, each an entry point of group
``vitdecomp`` of the ``vitdecomp`` distribution (found by the same loader as third-party packs)."""
