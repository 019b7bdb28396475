"""The ptq command line: click commands that parse, call the ptq library, print, and set the exit code."""
