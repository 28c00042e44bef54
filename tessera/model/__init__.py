"""Model code: decoder layers as attention and FFN units, with no knowledge of placement."""
