import sys

from ptq_cli.main import main

sys.exit(main())
