"""The wire contract wqd.v1, generated from proto/wqd/v1/*.proto by regen.sh (do not edit)."""
