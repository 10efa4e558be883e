"""goheap: the Go runtime's 2014 page heap on real memory.  See README.md."""
