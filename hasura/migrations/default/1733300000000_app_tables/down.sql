drop table public.organization_members;
drop table public.organizations;
drop table public.users;
