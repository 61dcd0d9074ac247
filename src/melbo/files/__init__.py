"""Files: run folders (the one module that knows their format), vectors in other tools' formats, and the
original post's published dumps."""
