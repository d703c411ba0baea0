"""The studio: a local web page over a JSON API to hear, steer, compare and harmonize (`smitin studio`)."""
