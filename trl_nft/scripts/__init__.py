"""Training scripts that `trl nft` / `trl-nft nft` launch with accelerate."""
