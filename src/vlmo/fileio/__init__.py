"""Files vlmo reads and writes for the user: `jsonfile` (the one JSON-file reader, one-line errors naming the file)
and `atomic` (the one way files are written: temporary file + fsync + rename, never a half-written file)."""
