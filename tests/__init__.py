"""The test suite; its folders mirror the package (tests/store, tests/experts, ...)."""
