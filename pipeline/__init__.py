"""One screening job: series -> volume -> slice selection -> bone measurement ->
prediction -> SR + SC datasets. No network code lives here."""
