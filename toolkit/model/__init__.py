"""Model side: loading (incl. embedded aliases and k-bit), the SFT module, adapters, merge."""
