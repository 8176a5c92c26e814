"""What records: stitching (which trajectory a request continues), the recorder (queue and one
writer task) and its journal (the fallback when the database refuses)."""
