"""spotrun's examples: a package, so `spotrun launch --function examples.<module>:<fn>` works."""
