"""The ground floor: errors, exit statuses and signals, argument checks (the door), options, files and run folders.

Nothing here knows of models or lenses; every other room may import from here."""
