#!/usr/bin/env bash
# Placeholder until `serve` lands.
echo "make run arrives with the serve issue" >&2
exit 1
