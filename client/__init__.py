"""The site: Flower ClientApp, local DP-SGD training, the persistent privacy ledger."""
