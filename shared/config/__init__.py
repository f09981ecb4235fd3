"""Configuration: the one loader (YAML, environment, `key=value`) and the settings blocks services share."""
