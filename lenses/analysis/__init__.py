"""Analysis views: each turns hidden states or lens outputs into a tidy pandas DataFrame."""
